"""The end-to-end benchmark and demo application built on pycomm (``pycomm bench e2e``, ``pycomm demo``).

An application, not part of the library: nothing outside ``pycomm.bench`` imports it, and
``import pycomm`` does not load it. Modules:

* :mod:`~pycomm.bench.cli`: the ``pycomm`` command line (also ``python -m pycomm``);
* :mod:`~pycomm.bench.e2e`: :func:`~pycomm.bench.e2e.run_e2e`, one benchmark run;
* :mod:`~pycomm.bench.tta`: time to accuracy (``pycomm bench tta``): steps and seconds to a target loss per link;
* :mod:`~pycomm.bench.demo`: the demo's defaults and :func:`~pycomm.bench.demo.run_demo`;
* :mod:`~pycomm.bench.config`: the models by name and :class:`~pycomm.bench.config.BenchConfig`;
* :mod:`~pycomm.bench.methods`: the method table (:data:`~pycomm.bench.methods.METHODS`);
* :mod:`~pycomm.bench.parallel`: FSDP2 and HSDP wrapping (``--parallel fsdp|hsdp``) and their methods' attach;
* :mod:`~pycomm.bench.memory`: the peak memory of a rank per method;
* :mod:`~pycomm.bench.launcher`: launcher pools, signals, hang detection, failure reasons;
* :mod:`~pycomm.bench.worker`: one DDP worker's training and measurement;
* :mod:`~pycomm.bench.report`: the table and the plots;
* :mod:`~pycomm.bench.models`, :mod:`~pycomm.bench.data`, :mod:`~pycomm.bench.netns`: the models,
  the byte corpus, the shaped network namespace.
"""
