"""The OpenAI-shaped frontend over the engine core: request validation and building, output
processing (detokenization, stop strings), response objects, and the `Engine` / `AsyncEngine` APIs.

The engine (`edgellm.engine`) never imports this package; this package drives the engine.
"""
