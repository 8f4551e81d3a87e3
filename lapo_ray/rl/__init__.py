"""Stage 3 on RLlib's new API stack: the LAPO agent module, its PPO Learner and connectors,
online fine-tuning and offline decoding."""
