def load_text_encoder(path, *, dtype=None, device=None, **hints):
    raise NotImplementedError
