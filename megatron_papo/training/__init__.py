"""The RL loop and what it is built from (one module per room; each imports only rooms below it).

- :mod:`.parts`: build a run (tokenizer, model chunks, optimizer, reference, rollout engine, data).
- :mod:`.trainer`: the loop (warm start, RL steps, checkpoints, evaluation).
- :mod:`.steps`: the typed, pure steps of one RL step (rollout, rewards, advantages, masking).
- :mod:`.passes`: the model passes (no-grad log-probs, the PAPO update) through the schedule.
- :mod:`.batch`: the training batch and its micro-batches; the one device boundary.
- :mod:`.schedule`: megatron-core's pipeline schedules fitted to any micro-batch count.
- :mod:`.optim`, :mod:`.checkpointing`, :mod:`.metrics`, :mod:`.evaluation`.

Importing this package imports nothing; importing a module of it imports megatron-core.
"""
