"""Whetstone engine. `from engine import load_model` is the scripting entry point:

    model, tokenizer = load_model("smollm2-135m-instruct" | HF_DIR | FILE.gguf | CHECKPOINT_DIR,
                                  dtype=torch.float32, device="cpu", adapter=None)

Imported lazily (PEP 562) so `import engine.config` stays light and free of import cycles.
"""

__all__ = ["load_model", "save_model"]


def __getattr__(name):
    if name == "load_model":
        from engine.hub import load_model
        return load_model
    if name == "save_model":
        from engine.checkpoint import save_model
        return save_model
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
