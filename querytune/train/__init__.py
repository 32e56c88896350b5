"""The training recipes (SFT, DPO, GRPO, reward-ranked fine-tuning) and what they learn from: click evidence,
the retrieval reward, alias tables."""
