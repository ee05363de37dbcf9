"""The core layer: the model handle and the mechanics every method builds on.

``handle`` (:class:`LoadedModel`), ``errors``, ``layers`` (decoder-layer discovery),
``fingerprint`` (model identity for artifacts), ``layout`` (chat prompts with known positions),
``activations`` (hooks, recording, capture), ``steering`` (adding vectors) and ``generation``
(the batched decode loop). Nothing here imports anything from safesteer outside ``core``.
"""
