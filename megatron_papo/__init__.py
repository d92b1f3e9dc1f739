"""megatron_papo: Perception-Aware Policy Optimization (PAPO) for vision-language models on Megatron-Core.

Subpackages import lazily; `import megatron_papo` does not import megatron-core.
"""

__version__ = "0.1.0"
