"""Everything about the environment the project runs in, kept out of the maths and the loop.

- :mod:`.mcore_compat`: the only module that patches or works around megatron-core.
- :mod:`.mcore_versions`: the megatron-core version found without importing it, and adapters for
  API differences between the supported releases.
- :mod:`.optional_deps`: probes for the optional GPU stack (Transformer Engine, vLLM, Triton) and
  :class:`~.optional_deps.MissingDependencyError` with an install hint.
- :mod:`.runtime_checks`: a run's config checked against this machine before anything starts.

Importing this package imports nothing; each module is imported where it is used.
"""
