"""Recording where users already train, and running many runs elsewhere.

Each integration is its own module and imports its framework only when imported (optional extras):
``trajscope.integrations.lightning`` (extra ``lightning``), ``trajscope.integrations.hf``
(``hf``), ``trajscope.integrations.ray`` (``ray``: the ``--executor ray`` of sweeps, tuning and
studies) and ``trajscope.integrations.mlflow`` (``mlflow``: ``trajscope export --format mlflow``).
"""
