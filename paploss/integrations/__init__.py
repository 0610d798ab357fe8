"""Optional integrations with other detection frameworks.

``paploss.integrations.mmdet`` registers the Parameterized AP Loss RetinaNet head in
MMDetection 3.x (install the extra: ``pip install 'paploss[mmdet]'``). Nothing in the
core library or the pipeline imports these modules, so they need no extra packages.
"""
