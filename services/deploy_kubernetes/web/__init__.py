"""The deploy server's web front end: the home and launch pages, launch badges and the operator
console, with their HTML in ``templates/`` and their scripts and styles in ``static/``. Like the
JSON API it calls the deployer's use-case methods; the two front ends do not import each other."""
