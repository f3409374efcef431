"""kd's caches in trainers other than ``kd distill``.

``kd.integrations.transformers``: a dataset, a collator and ``KDTrainer`` / ``KDTrainerMixin`` for
a transformers ``Trainer`` (and TRL's ``SFTTrainer``, where TRL is installed). Each integration is
its own module so that importing ``kd.integrations`` pulls in no trainer library.
"""
