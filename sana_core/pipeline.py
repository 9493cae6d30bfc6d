class SanaPipeline:
    pass
