"""The Spark engine: the sharded engine's per-person kernels run as Spark tasks.

Optional (``pip install 'privseg[spark]'``); nothing else in privseg imports it unless the spark
engine is chosen.
"""
