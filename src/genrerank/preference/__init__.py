"""Training beyond the logs: near-line preference pairs, DPO and policy-gradient fine-tuning.

The loop (the production article's "training paradigm upgrade"):

1. :mod:`.nearline` (``genrerank nearline``): for each train / valid request, K lists from a
   trained generator (policy samples, beams) and the heuristics (upstream order, MMR), scored
   by a list reward (:mod:`genrerank.rewards`) through the learned evaluator; preference pairs
   (:mod:`genrerank.data.pairs`) written as Parquet, a job apart from training.
2. :mod:`.finetune` (``genrerank finetune --method dpo|ppo``): the generator, started from its
   checkpoint, is tuned against a frozen copy of itself, on the pairs (DPO,
   :mod:`genrerank.losses.dpo`) or on lists it samples and the evaluator scores (PPO / GRPO,
   :mod:`genrerank.losses.policy_gradient`), by the shared trainer.

The simulator's oracle never enters this loop; it only measures the result (``genrerank bench
preference``).
"""
