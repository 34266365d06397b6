"""Lightning glue: the LightningModule, callbacks and the optimizer/schedule."""
