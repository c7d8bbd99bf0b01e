"""Find plugins by name and build the ones ``[plugins]`` enables.

Built-in plugins live in :mod:`relaymail.plugins`; a site's plugins are
single ``.py`` files in the directories listed in ``[plugins] path``.  Both
kinds are module-level objects providing ``twisted.plugin.IPlugin`` and
:class:`~relaymail.interfaces.IPluginFactory`, found with Twisted's plugin
system (see :mod:`relaymail.interfaces`).

A built-in plugin's module is imported only when its factory is wanted:
importing them all cost every worker process about 0.13 s at start
(callout pulls in the SMTP client, dkim pulls in dkimpy) for plugins most
sites never enable.  So the built-ins are named in :data:`BUILT_IN`, each
the module attribute named as the plugin; a test holds that table to what
Twisted's plugin system finds in :mod:`relaymail.plugins`.  Site plugins
are imported at once (:func:`_site_package` says why), found by
``getPlugins``.
"""

import difflib
import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Mapping

from twisted.logger import Logger
from twisted.plugin import getPlugins
from twisted.python.modules import getModule
from zope.interface import implementer

import relaymail
from relaymail.config import PLUGIN_SECTION_PREFIX, ConfigError, duration, integer
from relaymail.policy.answer_cache import DEFAULT_SIZE, AnswerCache
from relaymail.interfaces import (
    IConnectionPolicy, IHeloPolicy, IListExpander, IMessageFilter, IPluginContext,
    IPluginFactory, IRecipientValidator, IRouter, ISenderPolicy, ITransport)

log = Logger()

#: The name under which the site plugin directories are imported.  A site
#: plugin ``foo.py`` becomes the module ``relaymail_site_plugins.foo``.
SITE_PACKAGE = "relaymail_site_plugins"

#: Which [plugins] key enables plugins for which hook, in the order a
#: message meets them.
HOOKS = (
    ("connect", IConnectionPolicy),
    ("helo", IHeloPolicy),
    ("senders", ISenderPolicy),
    ("recipients", IRecipientValidator),
    ("expanders", IListExpander),
    ("filters", IMessageFilter),
    ("routers", IRouter),
    ("transports", ITransport),
)

#: Keys of every ``[plugin:NAME]`` that relaymail reads itself; the
#: plugin's factory never sees them (relaymail.policy.answer_cache).
RELAY_KEYS = ("cache_ttl", "cache_size")


class Hooks(dict):
    """Each [plugins] hook key to its plugins in order; ``caches`` maps
    ``id(plugin)`` to the AnswerCache of a plugin given a ``cache_ttl``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.caches = {}


# Hooks whose contract is written but that this version does not call yet:
# enabling a plugin there is refused rather than silently ignored.  Each
# leaves this set as it is wired in.
_NOT_CALLED_YET = frozenset()


@implementer(IPluginContext)
class PluginContext:
    """What a factory gets to build its plugin (see IPluginContext)."""

    def __init__(self, name, options, settings):
        self.name = name
        self.options = options
        self.settings = settings

    def config_error(self, key, problem):
        """A ConfigError about ``key`` in this plugin's ``[plugin:NAME]``."""
        return ConfigError(self.settings.source, f"plugin:{self.name}", key, problem)


def build_plugins(settings):
    """The recipient validators and list expanders :func:`build_hooks`
    builds: ``(validators, expanders)``, two lists in configured order."""
    hooks = build_hooks(settings)
    return hooks["recipients"], hooks["expanders"]


def build_hooks(settings):
    """Build the plugins each ``[plugins]`` hook key names.

    A plugin named at several hooks is built once and the same object is
    used at each.

    :param settings: a ``relaymail.config.Settings``.
    :return: a dict from each key of :data:`HOOKS` to its list of plugin
        objects, in configured order.
    :raise ConfigError: for an unknown name, a name listed twice, a plugin
        that cannot do the job it is listed for, a site plugin that does not
        load or that clashes with another's name, or a bad
        ``[plugin:NAME]`` setting.
    """
    factories = find_plugins(settings)
    _check_plugin_sections(settings, factories)
    built = {}
    hooks = Hooks()
    for key, interface in HOOKS:
        names = list(getattr(settings.plugins, key))
        plugins = []
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(settings.source, "plugins", key,
                                  f"plugin '{name}' is listed more than once")
            if key in _NOT_CALLED_YET:
                raise ConfigError(settings.source, "plugins", key,
                                  "this version of relaymail does not call plugins here yet")
            if name not in factories:
                known = ", ".join(sorted(factories)) or "none"
                raise ConfigError(settings.source, "plugins", key,
                                  f"no plugin named '{name}' (known: {known})")
            if name not in built:
                built[name] = _build(factories[name], name, settings)
                cache = _answer_cache(name, settings)
                if cache is not None:
                    hooks.caches[id(built[name])] = cache
            plugin = built[name]
            if not interface.providedBy(plugin):
                raise ConfigError(
                    settings.source, "plugins", key,
                    f"plugin '{name}' cannot be used here: it does not provide "
                    f"{interface.__name__}")
            plugins.append(plugin)
        hooks[key] = plugins
    _warn_about_unused_sections(settings, built)
    return hooks


#: The built-in plugins: name -> module, whose attribute of that name is
#: the factory.
BUILT_IN = {name: f"relaymail.plugins.{name}" for name in (
    "aliases", "callout", "dkim", "domains", "pipe", "ratelimit", "sql", "static")}


class FoundPlugins(Mapping):
    """Plugin name to factory, for every plugin relaymail can see.  A
    built-in's module is imported the first time its factory is looked up
    (see the module's text); names, ``in`` and :meth:`where` import
    nothing.  A built-in that does not import is a ConfigError when it is
    looked up, naming it."""

    def __init__(self, source):
        self._source = source
        self._factories = {}
        # Built-ins not imported yet: name -> module name.
        self._modules = dict(BUILT_IN)

    def __getitem__(self, name):
        factory = self._factories.get(name)
        if factory is None:
            module_name = self._modules[name]
            try:
                factory = getattr(importlib.import_module(module_name), name)
            except Exception as exc:
                raise ConfigError(self._source, "plugins", None,
                                  f"built-in plugin '{name}' ({module_name}) does not load: "
                                  f"{type(exc).__name__}: {exc}") from exc
            self._factories[name] = factory
            del self._modules[name]
        return factory

    def __iter__(self):
        # A list, not a view: looking a built-in up while iterating moves it.
        return iter(list(self._factories) + list(self._modules))

    def __len__(self):
        return len(self._factories) + len(self._modules)

    def __contains__(self, name):
        return name in self._factories or name in self._modules

    def where(self, name):
        """Where the plugin ``name`` comes from, for messages."""
        if name in self._modules:
            # Its file, found without importing it.
            spec = importlib.util.find_spec(self._modules[name])
            return getattr(spec, "origin", None) or self._modules[name]
        return _describe(self._factories[name])

    def _add(self, name, factory):
        self._factories[name] = factory


def find_plugins(settings):
    """Every plugin relaymail can see, built-in and site.

    :return: a :class:`FoundPlugins`, plugin name to factory.
    :raise ConfigError: when a site plugin does not load, or two plugins
        share a name (a site plugin never silently replaces a built-in one:
        which of the two runs would be a guess).
    """
    found = FoundPlugins(settings.source)
    paths = list(settings.plugins.path or ())
    package = _site_package(paths, settings)
    if package is not None:
        for factory in getPlugins(IPluginFactory, package):
            _register(found, factory, settings)
    return found


def _register(found, factory, settings):
    name = getattr(factory, "name", None)
    where = _describe(factory)
    if not isinstance(name, str) or not name:
        raise ConfigError(settings.source, "plugins", "path",
                          f"plugin {where} has no name")
    if name in found:
        raise ConfigError(
            settings.source, "plugins", "path",
            f"two plugins are named '{name}': {found.where(name)} and {where}; "
            f"rename one")
    found._add(name, factory)


def _describe(factory):
    """Where a factory comes from, for messages: its file when it has one."""
    module_name = getattr(factory, "__module__", None)
    module = sys.modules.get(module_name)
    return getattr(module, "__file__", None) or module_name or repr(factory)


def _site_package(paths, settings):
    """A package whose ``__path__`` is the site plugin directories.

    A synthetic package (rather than one the site has to write) is what lets
    a site plugin be one file dropped into a directory.  Every file in it is
    imported here, before ``getPlugins`` looks: ``getPlugins`` logs and skips
    a module that fails to import, which would leave a broken plugin looking
    merely unknown.

    :return: the package module, or None when there are no directories.
    """
    # Forget an earlier search (a reload, or another configuration in the
    # same process) so files are read afresh from the directories given now.
    for module_name in list(sys.modules):
        if module_name == SITE_PACKAGE or module_name.startswith(SITE_PACKAGE + "."):
            del sys.modules[module_name]
    importlib.invalidate_caches()
    if not paths:
        return None
    directories = []
    for path in paths:
        if not os.path.isdir(path):
            raise ConfigError(settings.source, "plugins", "path", f"{path} is not a directory")
        directories.append(os.path.abspath(path))

    package = types.ModuleType(SITE_PACKAGE, "relaymail site plugins ([plugins] path)")
    package.__path__ = directories
    # twisted.python.modules finds a loaded package by its __file__, which
    # must name an existing __init__ file whose grandparent directory is on
    # sys.path.  relaymail's own __init__ satisfies both; only __path__ is
    # used to find the plugin files.
    package.__file__ = relaymail.__file__
    sys.modules[SITE_PACKAGE] = package

    for module in getModule(SITE_PACKAGE).iterModules():
        try:
            importlib.import_module(module.name)
        except Exception as exc:
            raise ConfigError(
                settings.source, "plugins", "path",
                f"site plugin {module.filePath.path} does not load: "
                f"{type(exc).__name__}: {exc}") from exc
    return package


def _answer_cache(name, settings):
    """The AnswerCache ``[plugin:NAME] cache_ttl`` asks for, or None."""
    options = settings.plugin_options.get(name, {})
    section = f"{PLUGIN_SECTION_PREFIX}{name}"
    values = {}
    for key, parse, default in (("cache_ttl", duration(), "0"),
                                ("cache_size", integer(minimum=1), str(DEFAULT_SIZE))):
        try:
            values[key] = parse(options.get(key, default))
        except ValueError as error:
            raise ConfigError(settings.source, section, key, str(error)) from None
    if not values["cache_ttl"]:
        if "cache_size" in options:
            raise ConfigError(settings.source, section, "cache_size",
                              "set without cache_ttl, which turns the cache on")
        return None
    return AnswerCache(values["cache_ttl"], values["cache_size"])


def _build(factory, name, settings):
    options = {key: value for key, value in settings.plugin_options.get(name, {}).items()
               if key not in RELAY_KEYS}
    context = PluginContext(name, options, settings)
    try:
        return factory.build(context)
    except ConfigError:
        raise
    except Exception as exc:
        # Startup stops either way; a ConfigError names the plugin, and the
        # chained exception keeps the traceback for whoever debugs it.
        raise ConfigError(settings.source, f"plugin:{name}", None,
                          f"plugin could not be built: {type(exc).__name__}: {exc}") from exc


def _check_plugin_sections(settings, factories):
    """Refuse a [plugin:NAME] section for a plugin nobody provides: its
    name is mistyped, and its settings would be ignored while the plugin
    meant runs without them.  As for [delivry], suggest the close name."""
    for name in settings.plugin_options:
        if name in factories:
            continue
        guess = difflib.get_close_matches(name, sorted(factories), n=1)
        hint = (f"did you mean [plugin:{guess[0]}]?" if guess
                else f"known: {', '.join(sorted(factories)) or 'none'}")
        raise ConfigError(settings.source, f"{PLUGIN_SECTION_PREFIX}{name}", None,
                          f"no plugin named '{name}' is loaded ([plugins] path); {hint}")


def _warn_about_unused_sections(settings, built):
    # A [plugin:NAME] section for a plugin that exists but is not enabled
    # may be kept for later, or a forgotten [plugins] entry: say so rather
    # than ignore the settings in silence.
    for name in settings.plugin_options:
        if name not in built:
            log.warn("{source}: [plugin:{name}] is set but no plugin of that name is "
                     "enabled in [plugins]", source=settings.source, name=name)
