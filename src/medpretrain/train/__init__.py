"""The one training loop: the Trainer (`trainer`), schedules, the classifier and supervised fine-tuning.

Self-supervised pre-training (`medpretrain.pretrain`) builds its Trainer here too, so both run the same way.
"""

from medpretrain.train.classifier import (
    CLASSIFIER_FORMAT,
    Classifier,
    load_classifier,
    predict_logits,
    save_classifier,
)
from medpretrain.train.config import FinetuneConfig, StepPlan
from medpretrain.train.finetune import FinetuneResult, finetune
from medpretrain.train.module import FinetuneModule
from medpretrain.train.schedules import multistep, param_groups, warmup_cosine
from medpretrain.train.trainer import (
    PRECISIONS,
    default_precision,
    make_trainer,
    quiet_lightning,
    resolve_precision,
)

__all__ = [
    "CLASSIFIER_FORMAT",
    "PRECISIONS",
    "Classifier",
    "FinetuneConfig",
    "FinetuneModule",
    "FinetuneResult",
    "StepPlan",
    "default_precision",
    "finetune",
    "load_classifier",
    "make_trainer",
    "multistep",
    "param_groups",
    "predict_logits",
    "quiet_lightning",
    "resolve_precision",
    "save_classifier",
    "warmup_cosine",
]
