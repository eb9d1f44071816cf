# dirtymig: build in release mode and install, as Linux tools are.
#
#   make                      build .build/release/dirtymig and dirtymig-bench
#   sudo make install         install them, the man page and the shell completions under PREFIX
#   sudo make uninstall       remove what `make install` installed
#
# `make install` builds only what is missing or older than the sources, so `make` followed by
# `sudo make install` builds as you and installs as root: sudo resets PATH to its secure_path,
# where a Swift toolchain in /opt or ~/.local is not, and a build as root would leave
# root-owned files in .build that your next build cannot write.
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
BINARIES = $(addprefix $(BUILDDIR)/,$(PROGRAMS))
SOURCES := Package.swift $(shell find Sources -type f 2>/dev/null)

.PHONY: all build install uninstall

all: build

build:
	$(SWIFT) build -c release $(SWIFTFLAGS)
	touch -c $(BINARIES)

# The binaries, built when missing or older than a source (touched after the build: SwiftPM
# leaves a binary alone when nothing it links changed, and make would then build every time).
$(BINARIES): $(SOURCES)
	@command -v $(firstword $(SWIFT)) >/dev/null 2>&1 || { \
		echo "make: '$(firstword $(SWIFT))' is not on this PATH ($$PATH), and $(BINARIES) need building." >&2; \
		echo "make: build first as yourself with 'make', then run 'sudo make install' (sudo resets PATH)." >&2; \
		exit 1; }
	$(SWIFT) build -c release $(SWIFTFLAGS)
	touch -c $(BINARIES)

install: $(BINARIES)
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
