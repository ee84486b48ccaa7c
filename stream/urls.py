"""Broker URLs as they may be shown: the password masked.

A URL may carry credentials (``redis://user:password@host``, or ``?password=`` in the
query, which redis-py reads too). Anything printed or logged goes through ``masked``.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: What a password is replaced with.
MASK = "***"
#: Query arguments that hold secrets.
SECRET_ARGS = frozenset({"password"})


def masked(url: str) -> str:
    """``url`` with its password (in the user info or the query) replaced by ``***``.

    Parameters:
        url: any URL; one that does not parse is returned with everything up to its
            last ``@`` masked.

    Returns:
        The URL safe to print.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK + url[url.rfind("@") :] if "@" in url else url
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if colon else netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_ARGS for k, _ in pairs):
            query = urlencode([(k, MASK if k.lower() in SECRET_ARGS else v) for k, v in pairs], safe="*/")
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing secret (and urlunsplit would drop unix:///'s empty host)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


#: The variable that hands a broker URL to a child process: the environment, unlike
#: argv, is not visible to other users in ``ps``.
REDIS_URL_ENV = "ROADSTREAM_REDIS_URL"
