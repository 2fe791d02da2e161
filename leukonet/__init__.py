"""leukonet: white blood cell classification in stained blood smears."""

from leukonet import resolvers

resolvers.register()
