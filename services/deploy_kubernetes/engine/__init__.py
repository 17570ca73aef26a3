"""The deploy server's domain engine: deployment state (:mod:`.records`), launching
(:mod:`.launcher`, :mod:`.launches`), ending (:mod:`.ending`), its loops (:mod:`.keeper`,
:mod:`.culler`, :mod:`.pools`), start-up reconciliation, templates, per-client limits and metrics,
composed by :class:`.deployer.Deployer`, whose use-case methods are all the front ends call.

It knows the backend and store ports (:mod:`..backends.base`, :mod:`..store.base`), never an
adapter, and nothing of HTTP."""
