"""Continual task addition: strategies (OWLoRA and baselines), add-task, pipelines, result matrices."""
