#!/usr/bin/env bash
# Installs the Debian packages spicestream and its tests use, if any is missing.
# Real clients (remote-viewer, spicy) and the X tools for the end-to-end tests are Debian
# packages; everything Python goes into .venv (see the Makefile).
set -euo pipefail
PACKAGES=(
  python3 python3-venv python3-pip python3-dev gcc pkg-config
  # GStreamer encoders and the typelibs PyGObject needs (plus its build dependencies)
  gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-x
  gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-plugins-bad-1.0
  libgirepository1.0-dev libcairo2-dev
  # real clients and the X tools the end-to-end tests drive them with
  xvfb xdotool xclip imagemagick x11-utils x11-xserver-utils xterm iproute2
  xserver-xorg-video-dummy  # an Xorg whose screen follows the client (RandR), for --source x11
  virt-viewer spice-client-gtk gir1.2-spiceclientglib-2.0 spice-html5 chromium
  # sound: Opus (libopus through ctypes), PulseAudio to record what clients play, pulsesrc
  libopus0 pulseaudio pulseaudio-utils gstreamer1.0-pulseaudio
  # RGB to I420 for the software video encoders (libyuv through ctypes: video/yuv.py)
  libyuv0
  # the X11 capture's events, MIT-SHM reads and cursor images, on libxcb directly (sources/xcb.py)
  libxcb1 libxcb-shm0 libxcb-xfixes0
  # the reference server, for side-by-side figures (bench/glass_x11.py)
  xserver-xspice
  # systemd-analyze, to check contrib/spicestream@.service
  systemd
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing Debian packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
