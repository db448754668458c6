"""The small core every stage builds on, importing nothing from tvmedge outside ``core``:

* ``model``     - the imported model (Relax module + tensor specs) and its ``.relax`` file;
* ``artifact``  - the compiled artifact's format (``.tar`` with library + metadata), read and written;
* ``graph``     - Relax graph-pattern helpers (bindings, op names, shapes, constants, conv attrs);
* ``errors``    - the one user-facing error type and the ``first_line`` of any exception;
* ``metrics``   - output errors between two models, top-1 accuracy, mean IoU;
* ``jsonio``    - strict JSON out (no bare NaN/Infinity);
* ``resources`` - where the ``targets/`` and ``schedules/`` data folders are.
"""
