"""Training-loop integrations: `flashnorm.integrations.transformers` (``DPTrainer``, extra ``[hf]``) and
`flashnorm.integrations.lightning` (extra ``[lightning]``). Import the submodule you need; neither is
imported here, so FlashNorm itself does not depend on those packages."""
