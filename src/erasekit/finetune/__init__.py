"""Fine-tuning erasure methods on one training loop: ESD, TRCE stage 2, and their composition with
closed-form methods."""
