"""Training stages, each a LightningModule with the math of its step beside the code."""
