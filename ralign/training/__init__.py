"""The learner side: the training config, the DeepSpeed learner, its checkpoints and collectives."""
