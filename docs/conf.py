# Sphinx configuration of the course website. Run through `python docs/build.py`, which executes
# the notebooks, prepares them in docs/_build/src and calls sphinx-build with `-c docs`.
import os
from pathlib import Path

project = 'detr_explained'
author = 'detr_explained developers'
copyright = '2026, detr_explained developers'
root_doc = 'index'  # nbs/00_index.ipynb, renamed by build.py

extensions = ['myst_nb', 'sphinx.ext.mathjax']
exclude_patterns = ['**.ipynb_checkpoints']

# ---- notebooks: executed beforehand by build.py (as nbdev-test runs them), never here
nb_execution_mode = 'off'
nb_ipywidgets_js = {}         # widget views are removed; never load widget JS from a CDN
nb_merge_streams = True
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence', 'deflist']
myst_dmath_double_inline = True
myst_heading_anchors = 3
suppress_warnings = ['myst.header', 'mystnb.unknown_mime_type', 'misc.highlighting_failure']

# ---- maths: MathJax 3 served from this site (_static/mathjax), nothing from outside
html_static_path = [os.environ.get('DETR_EXPLAINED_DOCS_STATIC', str(Path(__file__).parent/'_build'/'static'))]
html_static_path.append(str(Path(__file__).parent/'static'))   # figures.css: figures keep their aspect ratio
html_css_files = ['figures.css']
mathjax_path = 'mathjax/tex-chtml.js'
mathjax3_config = {'tex': {'tags': 'none'}, 'chtml': {'displayAlign': 'center'}}

# ---- theme: sphinx-book-theme (pydata-based), all assets bundled in the package
html_theme = 'sphinx_book_theme'
html_title = 'detr_explained'
html_favicon = 'favicon.svg'    # else the browser asks for /favicon.ico, which is not there
html_theme_options = {
    'home_page_in_toc': True,
    'show_toc_level': 2,
    'show_navbar_depth': 1,
    'use_download_button': False,
    'use_fullscreen_button': False,
    'use_repository_button': False,
}
html_context = {'default_mode': 'light'}  # without it pydata's theme script logs an error on a first visit
html_last_updated_fmt = None
html_copy_source = False
html_show_sourcelink = False
