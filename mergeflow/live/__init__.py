"""A trained model in memory: save_pretrained_merged / push_to_hub_merged / patch, and the Trainer
callback."""
