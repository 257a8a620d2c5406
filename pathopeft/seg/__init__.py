"""PEFT segmentation (``pathopeft segment``): timm/SAM encoder + adapter + decoder, trained with Lightning.

Modules: ``data`` (find, read, check and split image/mask pairs), ``datamodule`` (albumentations
transforms, datasets, LightningDataModule), ``encoders`` (timm encoders; SAM/MedSAM checkpoints),
``decoders`` (UNETR, PUP, smp Unet/FPN), ``model`` (tuning modes, checkpoint keys), ``metrics``
(MONAI losses/metrics, sliding-window inference), ``module`` (LightningModule), ``checkpoint``,
``train``, ``predict``, ``compare``, ``synth`` (a synthetic shapes set). Nothing is imported here,
so ``import pathopeft.seg.data`` stays light.
"""
