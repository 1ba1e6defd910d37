"""Downstream metrics as the field's official scripts define them (pure Python and numpy):
SQuAD's exact match and F1, conlleval's entity F1, MS MARCO's MRR@10 and trec_eval's nDCG@10."""
