# dirtymig: build in release mode and install, as Linux tools are.
#
#   make                      build .build/release/dirtymig and dirtymig-bench
#   make install              install them, the man page and the shell completions under PREFIX
#   make uninstall            remove what `make install` installed
#
# PREFIX defaults to /usr/local; DESTDIR is prepended to every installed path (for packages).
# SWIFTFLAGS is passed to `swift build` (the tests build with -Xswiftc -enable-testing).

PREFIX ?= /usr/local
DESTDIR ?=
SWIFT ?= swift
SWIFTFLAGS ?=
BUILDDIR ?= .build/release
INSTALL ?= install

bindir = $(PREFIX)/bin
mandir = $(PREFIX)/share/man
datadir = $(PREFIX)/share

PROGRAMS = dirtymig dirtymig-bench

.PHONY: all build install uninstall

all: build

build:
	$(SWIFT) build -c release $(SWIFTFLAGS)

install: build
	$(INSTALL) -d $(DESTDIR)$(bindir) $(DESTDIR)$(mandir)/man1 \
		$(DESTDIR)$(datadir)/bash-completion/completions \
		$(DESTDIR)$(datadir)/zsh/site-functions \
		$(DESTDIR)$(datadir)/fish/vendor_completions.d
	$(INSTALL) -m 755 $(addprefix $(BUILDDIR)/,$(PROGRAMS)) $(DESTDIR)$(bindir)/
	$(INSTALL) -m 644 man/dirtymig.1 $(DESTDIR)$(mandir)/man1/dirtymig.1
	$(INSTALL) -m 644 completions/dirtymig.bash $(DESTDIR)$(datadir)/bash-completion/completions/dirtymig
	$(INSTALL) -m 644 completions/_dirtymig $(DESTDIR)$(datadir)/zsh/site-functions/_dirtymig
	$(INSTALL) -m 644 completions/dirtymig.fish $(DESTDIR)$(datadir)/fish/vendor_completions.d/dirtymig.fish

uninstall:
	rm -f $(addprefix $(DESTDIR)$(bindir)/,$(PROGRAMS)) \
		$(DESTDIR)$(mandir)/man1/dirtymig.1 \
		$(DESTDIR)$(datadir)/bash-completion/completions/dirtymig \
		$(DESTDIR)$(datadir)/zsh/site-functions/_dirtymig \
		$(DESTDIR)$(datadir)/fish/vendor_completions.d/dirtymig.fish
