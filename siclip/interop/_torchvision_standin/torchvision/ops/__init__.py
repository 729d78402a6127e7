from . import misc
