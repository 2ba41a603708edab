"""The generators mf-worker ships: `template` (offline, deterministic) and `openai` (any
OpenAI-compatible chat-completions server).

They are plugins like any other: they import only the plugin API (`mf_worker.generation`) and
are found through the ``mf_worker.generators`` entry points (``template`` also by name without
installed metadata). Nothing in the engine imports them.
"""
