"""Moves weights between local Hugging Face BERT checkpoints and our NNX models.

The same API as :mod:`apollo.models.roberta.params` (and the same code: only the
names differ, see :class:`~apollo.models.roberta.params.CheckpointFamily`)::

    model, report = from_pretrained(minilm_checkpoint_dir(cache), PretrainingModel)
    print(report.summary())  # MiniLM has no MLM head: cls.predictions.* are missing

Name correspondence, HF ``BertFor*`` -> ours: the trunk as RoBERTa's under ``bert.``
(a bare ``BertModel`` has no prefix), and::

    cls.predictions.transform.dense       -> mlm_head.dense
    cls.predictions.transform.LayerNorm   -> mlm_head.layer_norm
    cls.predictions.bias                  -> mlm_head.bias
    cls.predictions.decoder.weight        -> (tied to the word embeddings)
    classifier.{dense,out_proj}           -> ecls_head.{dense,out_proj} (pretraining;
                                             no HF counterpart, kept for round trips)
    classifier                            -> scorer (multiple choice)

A head the checkpoint lacks (MiniLM has no MLM head and no E-CLS head) keeps its
fresh initialisation and is listed in ``ImportReport.missing``; BERT's
next-sentence head (``cls.seq_relationship``) has no place here and is listed as
unused.
"""

from __future__ import annotations

from apollo.models.bert.model import BERT_FIELDS
from apollo.models.roberta.params import CheckpointFamily

BERT = CheckpointFamily(
  model_type="bert",
  display_name="BERT",
  class_prefix="Bert",
  trunk_prefix="bert.",
  mlm_dense="cls.predictions.transform.dense",
  mlm_layer_norm="cls.predictions.transform.LayerNorm",
  mlm_bias="cls.predictions.bias",
  mlm_decoder="cls.predictions.decoder",
  position_scheme=BERT_FIELDS["position_scheme"],
  config_defaults={
    k: BERT_FIELDS[k] for k in ("type_vocab_size", "layer_norm_eps", "pad_token_id")
  },
  extra_hf_config={},
)

config_from_hf = BERT.config_from_hf
config_to_hf = BERT.config_to_hf
import_hf_state_dict = BERT.import_hf_state_dict
from_pretrained = BERT.from_pretrained
hf_state_dict = BERT.hf_state_dict
export_hf = BERT.export_hf
