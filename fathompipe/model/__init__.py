"""The winner's model: its architecture, preprocessing, and the slim weights exported from its checkpoint."""
