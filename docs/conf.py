"""Sphinx settings for the offline docs site.

`python docs/build.py` runs the notebooks, processes them with nbdev, stages them in docs/_build/src/
and runs Sphinx with this folder as its configuration folder; the site lands in docs/_site/."""
from nbdev.config import get_config

_cfg = get_config()  # Sphinx runs this file from docs/, so this finds the project's pyproject.toml
project = _cfg.title
html_title = _cfg.title
author = f"{_cfg.lib_name} developers"
copyright = project  # the footer's "Copyright ©" names its holder
release = version = __import__('re').search(r'__version__\s*=\s*["\']([^"\']+)',
                                            (_cfg.lib_path/'__init__.py').read_text())[1]

# MathJax from the package's own files (copied into _static/mathjax), not a CDN, so formulas render offline.
extensions = ['myst_nb', 'sphinx-mathjax-offline']
root_doc = 'index'
exclude_patterns = ['**.ipynb_checkpoints']

# The build has run the notebooks already (with nbdev-test's rules) and stored their outputs.
nb_execution_mode = 'off'
# show_doc prints markdown with Quarto-style link attributes: parse outputs as MyST with the same extensions.
nb_render_markdown_format = 'myst'
myst_enable_extensions = ['attrs_inline', 'colon_fence', 'dollarmath']
myst_heading_anchors = 3
nb_merge_streams = True

html_theme = 'furo'
html_static_path = ['_static']
html_css_files = ['custom.css']
html_copy_source = False
html_show_sourcelink = False
html_theme_options = {'top_of_page_buttons': []}
html_favicon = '_static/favicon.svg'  # a depthwise 3×3 kernel, centre tap on: BNET's identity start
