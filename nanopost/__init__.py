"""nanopost: post-training a small GPT with SFT and PPO, from scratch."""
