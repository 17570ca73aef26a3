"""Where apps run: the backend port (:mod:`.base`), readiness checks shared by the backends that
reach their apps themselves (:mod:`.readiness`), and one adapter per place: :mod:`.local`
(processes of this host), :mod:`.docker` and :mod:`.kubernetes`. Each adapter is the only user of
its client library and translates everything it raises."""
