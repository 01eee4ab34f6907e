"""RL and distillation math: KL estimators, GRPO / PPO losses, training-inference mismatch metrics."""
