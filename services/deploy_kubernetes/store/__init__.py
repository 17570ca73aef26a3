"""Where deployment records and templates are kept: the port (:mod:`.base`) and its MongoDB
adapter (:mod:`.mongo`, the deploy server's only user of pymongo)."""
