"""The engine: plain PyTorch training, evaluation and prediction (no printing, no typer/rich).

Importing this package is cheap; each submodule imports torch itself.  Training entry point:
``medcli.engine.trainer.train(TrainConfig(...), callback=...)``; checkpoints: ``medcli.engine.checkpoint``.
"""
