"""plugmoe's serving layer: the engine loop that owns the model, and a thin FastAPI app around it."""
