"""The pure arithmetic of every stage's loss, on tensors: ``lm`` (the PHF pretraining objectives),
``ppo`` (per-token KL rewards, GAE, clipped policy and value losses), ``group`` (GRPO's and
RLOO's advantages and clipped objective) and ``preference`` (DPO/IPO/hinge and the reward
model's Bradley-Terry / N-way loss). Nothing here builds a model, reads data or logs: the
stages (phf/stages/) drive these, and tests check them on hand-built numbers."""
