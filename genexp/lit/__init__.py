"""Lightning glue: the generic LightningModule, the DataModule, callbacks and logger set-up."""
