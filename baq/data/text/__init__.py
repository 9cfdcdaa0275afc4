"""Text data for the language-model bias study: tokenizer, SYNTHETIC corpus, loaders.

  tokenizer     a word-level `tokenizers.Tokenizer` trained on a sentence list
                (saved and loaded as its native tokenizer.json), `encode_batch`
                to right-padded int32 ids, and `special_ids` for the usual
                BOS/EOS/PAD names of word-level and GPT-2-style BPE tokenizers
  synthetic     an offline, seeded, clearly labelled SYNTHETIC corpus with a
                controlled occupation-group association (gender, age), written
                with matching CrowS-Pairs and StereoSet layout files
  templates     the SYNTHETIC corpus's occupations, group words and templates
  crows_pairs   `load_crows_pairs`: crows_pairs_anonymized.csv as arrays
  stereoset     `load_stereoset`: StereoSet's dev.json as arrays, each
                example's three candidates in (stereotype, anti-stereotype,
                unrelated) order, with the text a causal LM scores

The metrics computed from a model's log-likelihoods of these sentences are
pure functions of arrays in `baq.fairness.stereotype`; nothing here runs a
model.
"""
