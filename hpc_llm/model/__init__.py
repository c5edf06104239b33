"""The GPT-2 model: layers (forward/backward pairs) and the model that strings them together."""
