"""The over-refusing LoRA organism: training data and LoRA (``training``), the build job
(``build``) and the committed adapter (``adapter/``)."""
