"""Training pipelines (imported as `zoo.pipelines`): stages, trainer, data, eval, launch scripts.

The model library (`zoo`) never imports this package.
"""
