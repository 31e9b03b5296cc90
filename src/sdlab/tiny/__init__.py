"""sdlab-tiny: the small from-scratch model shipped with sdlab, as a project built on the library.

``sdlab.tiny.datasets`` renders its training data (emoji and coloured shapes with stated captions),
``sdlab.tiny.evaluation`` scores generated images against their prompts (``sdlab eval``),
``sdlab.tiny.image_tower`` and ``sdlab.tiny.text_task`` train its text encoder CLIP-style
(``sdlab train --task text``), and ``sdlab.tiny.assemble`` joins the separately trained parts into a model
(``recipes/sdlab-tiny``). Its family spec stays with the others (``sdlab.families.sdlab_tiny``), its
weights with the package data (``sdlab/models/data``). The core library never imports this package.
"""
