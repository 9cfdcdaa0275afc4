"""The group mathematics that training and allocation share.

  losses        per-example cross-entropy and per-group statistics (masked,
                finite when a group is absent from a batch)
  metrics       accuracy, per-group accuracy and fairness gaps of predictions
  regularizers  the penalty research API: a registry of (init, apply) pairs
                that the trainer adds to the loss
"""
