# mkGuest: a guest description -> an mvm image directory
#
#   $out/vmlinux         the kernel: on x86_64 the ELF extracted from the kernel's bzImage
#                        at build time (src/mvm/builders/vmlinux.py), which QEMU boots at its
#                        PVH entry point; if it has no PVH note, the bzImage itself (and the
#                        manifest's `kernel_note` says why); elsewhere the image as nixpkgs
#                        builds it (`kernel.target`: Image on aarch64)
#   $out/initrd          busybox + the virtio/ext4 modules, made by src/mvm/builders/initrd.py
#   $out/rootfs.ext4     the closure of `packages` (and of every store path the services
#                        name), the guest agent, a Python for it, /etc/mvm/guest.json, `files`
#   $out/manifest.json   what `mvmctl build --flake` imports into its image store
#
# The rootfs has the same layout as the Debian builder's (src/mvm/builders/guestfiles.py):
# /usr/lib/mvm/init is PID 1, the agent is /usr/lib/mvm/mvm/guest, services run as `mvm`
# (uid 1000) unless they name a user. Package programs are linked into /usr/bin, busybox's
# applets into /bin and /sbin (nixpkgs' busybox splits them: `sh` in bin/, `ip` in sbin/),
# and guest.json's `path` is the guest's PATH.
#
# Only nixpkgs attributes with stable, documented signatures are used: runCommand,
# writeText, closureInfo, python3, e2fsprogs, kmod, zstd, pkgsStatic.busybox,
# linuxPackages.kernel, stdenv.hostPlatform and buildPackages.
{
  pkgs,
  agentSrc,
  initrdScript,
  vmlinuxScript,
}:
args:
let
  inherit (builtins)
    attrNames
    attrValues
    concatStringsSep
    elem
    filter
    foldl'
    genList
    isPath
    length
    elemAt
    toJSON
    ;

  spec = import ./spec.nix args;

  getBin = p: p.bin or p;
  python = pkgs.python3;
  buildPython = pkgs.buildPackages.python3;
  busybox = pkgs.pkgsStatic.busybox;
  e2fsprogs = getBin pkgs.buildPackages.e2fsprogs;
  kmod = getBin pkgs.buildPackages.kmod;
  zstd = getBin pkgs.buildPackages.zstd;

  kernel = if spec.kernel != null then spec.kernel else pkgs.linuxPackages.kernel;
  # nixpkgs' kernels install their image as $out/${target}; a kernel without `target` is
  # taken to follow its platform's (bzImage on x86_64, Image on aarch64).
  kernelFile = kernel.target or pkgs.stdenv.hostPlatform.linux-kernel.target;
  kernelVersion = kernel.modDirVersion or kernel.version;
  # Newer nixpkgs puts the modules in a `modules` output; older ones keep them in `out`.
  modulesRoot = kernel.modules or kernel;

  # The same document GuestSpec.guest_json() writes for mvm.toml, plus the guest's PATH.
  guestDoc = {
    schema_version = 1;
    frontend = "nix";
    inherit (spec)
      name
      hostname
      cpus
      memory
      logLimitMb
      services
      healthChecks
      ;
    packages = map (p: p.name or (baseNameOf (toString p))) spec.packages;
    path = "/usr/bin:/bin:/sbin";
  };
  guestText = toJSON guestDoc;
  guestJson = pkgs.writeText "mvm-${spec.name}-guest.json" guestText;

  # Accounts, as guestfiles.account_lines: `mvm` (1000) first, then each other service user.
  serviceUsers = foldl' (acc: u: if u == "root" || elem u acc then acc else acc ++ [ u ]) [ "mvm" ] (
    map (s: s.user) (attrValues spec.services)
  );
  users = genList (i: {
    name = elemAt serviceUsers i;
    uid = 1000 + i;
  }) (length serviceUsers);
  lines = xs: concatStringsSep "\n" xs + "\n";
  passwd = lines (
    [ "root:x:0:0:root:/root:/bin/sh" ]
    ++ map (u: "${u.name}:x:${toString u.uid}:${toString u.uid}:mvm service user:/home/${u.name}:/bin/sh") users
  );
  group = lines (
    [
      "root:x:0:"
      "tty:x:5:"
      "mvm:x:1000:${concatStringsSep "," (map (u: u.name) (filter (u: u.name != "mvm") users))}"
    ]
    ++ map (u: "${u.name}:x:${toString u.uid}:") (filter (u: u.name != "mvm") users)
  );
  shadow = lines (map (u: "${u.name}:!:19000:0:99999:7:::") ([ { name = "root"; } ] ++ users));

  # The guest agent (stdlib-only Python), byte-compiled: store files have mtime 1, so the
  # .pyc use unchecked hashes (an uncompiled agent boots seconds slower under TCG).
  agent = pkgs.runCommand "mvm-guest-agent" { } ''
    mkdir -p $out/lib/mvm/mvm/guest
    cp ${agentSrc}/*.py $out/lib/mvm/mvm/guest/
    : > $out/lib/mvm/mvm/__init__.py
    { printf '%s\n' '#!${python}/bin/python3 -IS'; cat ${agentSrc}/entry.py; } > $out/lib/mvm/init
    chmod 0755 $out/lib/mvm/init
    PYTHONDONTWRITEBYTECODE=1 ${python}/bin/python3 -m compileall -f -q --invalidation-mode unchecked-hash $out/lib/mvm/mvm >/dev/null
  '';

  # `files`: guest path -> a file or directory of the flake (a path like ./server.py) or any
  # store path. Sorted, so a directory is copied before files put inside it. A package or
  # store path may refer to other store paths (a script's interpreter), so its closure comes
  # along; a path from the flake refers to nothing.
  fileTargets = attrNames spec.files;
  filesList = concatStringsSep "" (map (t: "${t}\t${spec.files.${t}}\n") fileTargets);
  fileClosures = filter (v: !(isPath v)) (attrValues spec.files);

  closure = pkgs.closureInfo {
    rootPaths = [
      agent
      guestJson
      python
      busybox
    ]
    ++ spec.packages
    ++ fileClosures;
  };

  rootfs =
    pkgs.runCommand "mvm-${spec.name}-rootfs"
      {
        inherit
          passwd
          group
          shadow
          filesList
          ;
        passAsFile = [
          "passwd"
          "group"
          "shadow"
          "filesList"
        ];
        packages = spec.packages;
        homes = map (u: u.name) users;
        uids = map (u: toString u.uid) users;
      }
      ''
        root=$PWD/root
        mkdir -p $root/bin $root/sbin $root/etc/mvm $root/usr/bin $root/usr/lib $root/nix/store \
          $root/proc $root/sys $root/dev $root/run $root/tmp $root/var/tmp $root/root $root/mnt
        chmod 1777 $root/tmp $root/var/tmp
        chmod 0700 $root/root

        echo "copying the closure ($(wc -l < ${closure}/store-paths) store paths)"
        while read -r path; do
          cp -a "$path" $root/nix/store/
        done < ${closure}/store-paths

        # /bin and /sbin: busybox's applets (sh for `sh -c`, and tools for `mvmctl exec`);
        # nixpkgs' busybox (CONFIG_INSTALL_NO_USR) has `ip`, `poweroff`, `sysctl` … in sbin/
        for d in bin sbin; do
          [ -d ${busybox}/$d ] || continue
          for f in ${busybox}/$d/*; do
            [ -e "$root/$d/''${f##*/}" ] || ln -s "$f" "$root/$d/''${f##*/}"
          done
        done
        # /usr/bin: the packages' programs, first package wins
        for p in $packages; do
          for d in "$p/bin" "$p/sbin"; do
            [ -d "$d" ] || continue
            for f in "$d"/*; do
              n=''${f##*/}
              [ -e "$root/usr/bin/$n" ] || [ -L "$root/usr/bin/$n" ] || ln -s "$f" "$root/usr/bin/$n"
            done
          done
        done
        [ -e $root/usr/bin/env ] || ln -s /bin/env $root/usr/bin/env

        ln -s ${agent}/lib/mvm $root/usr/lib/mvm
        cp ${guestJson} $root/etc/mvm/guest.json
        cp "$passwdPath" $root/etc/passwd
        cp "$groupPath" $root/etc/group
        cp "$shadowPath" $root/etc/shadow
        chmod 0640 $root/etc/shadow
        printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' > $root/etc/nsswitch.conf
        printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' > $root/etc/hosts
        for u in $homes; do
          mkdir -p $root/home/$u
          chmod 0750 $root/home/$u
        done

        # `files`, as mvm.toml's: copies (a directory whole), after everything else so they
        # may replace it. Store files are read-only (0444/0555): the copies keep the exec bit
        # and get u+w, so they are 0644/0755, readable by the service users.
        while IFS=$'\t' read -r target source; do
          [ -n "$target" ] || continue
          dest=$root$target
          mkdir -p "$(dirname "$dest")"
          if [ -d "$source" ] && [ ! -L "$source" ]; then
            mkdir -p "$dest"
            cp -RP "$source/." "$dest/"
          else
            rm -rf "$dest"
            cp -P "$source" "$dest"
          fi
          [ -L "$dest" ] || chmod -R u+w "$dest"
          echo "files: $target"
        done < "$filesListPath"

        # Everything belongs to root except the service users' homes. The builder may be an
        # unprivileged build user, so ownership is set in the image itself, with debugfs.
        find $root -exec touch -h -d @1 {} +
        inodes=$(find $root | wc -l)
        size=$(du -smx $root | cut -f1)
        size=$((size + size / 5 + 64))
        export E2FSPROGS_FAKE_TIME=1
        ${e2fsprogs}/bin/mkfs.ext4 -q -F -T default -O ^has_journal -L mvm-root \
          -U 44444444-4444-4444-8888-888888888888 -E root_owner=0:0,hash_seed=44444444-4444-4444-8888-888888888888 \
          -N $((inodes + inodes / 4 + 1024)) -d $root rootfs.ext4 "''${size}M"
        {
          (cd $root && find . -mindepth 1 -printf '%P\n') | while read -r f; do
            echo "sif \"/$f\" uid 0"
            echo "sif \"/$f\" gid 0"
          done
          set -- $uids
          for u in $homes; do
            echo "sif /home/$u uid $1"
            echo "sif /home/$u gid $1"
            shift
          done
        } > owners.debugfs
        ${e2fsprogs}/bin/debugfs -w -f owners.debugfs rootfs.ext4 >/dev/null
        ${e2fsprogs}/bin/e2fsck -fn rootfs.ext4 >/dev/null
        mkdir $out
        mv rootfs.ext4 $out/
      '';

  # The initrd loads the virtio and ext4 modules (nixpkgs builds them as modules) and
  # switches to the rootfs. A kernel without modules gets an initrd that only mounts.
  initrd = pkgs.runCommand "mvm-initrd-${kernelVersion}" { } ''
    mods=${modulesRoot}/lib/modules/${kernelVersion}
    if [ ! -e "$mods/modules.dep" ]; then
      mkdir -p lib/modules/${kernelVersion}
      if [ -d "$mods" ]; then
        cp -r "$mods/." lib/modules/${kernelVersion}/
        chmod -R u+w lib
      fi
      ${kmod}/bin/depmod -b $PWD ${kernelVersion}
      mods=$PWD/lib/modules/${kernelVersion}
    fi
    export PATH=${zstd}/bin:$PATH
    mkdir $out
    ${buildPython}/bin/python3 ${initrdScript} --modules "$mods" \
      --busybox ${busybox}/bin/busybox --out $out/initrd
  '';

  # The kernel QEMU boots, chosen at build time by src/mvm/builders/vmlinux.py (stdlib Python):
  # the ELF vmlinux inside the bzImage when it has the PVH note (QEMU's microvm then starts it
  # directly, skipping the in-guest decompression); otherwise the kernel image as built, with
  # the reason in kernel.json. nixpkgs compresses x86_64 kernels with zstd (KERNEL_ZSTD).
  bootKernel = pkgs.runCommand "mvm-kernel-${kernelVersion}" { } ''
    export PATH=${zstd}/bin:$PATH
    ${buildPython}/bin/python3 ${vmlinuxScript} ${kernel}/${kernelFile} --out-dir $out
  '';

  # Completed at build time with the kernel's name and boot mode (bootKernel/kernel.json).
  manifest = pkgs.writeText "mvm-${spec.name}-manifest.json" (toJSON {
    schema_version = 1;
    name = spec.name;
    frontend = "nix";
    kernel_image = kernelFile;
    kernel_version = kernelVersion;
    initrd = "initrd";
    rootfs = "rootfs.ext4";
    transports = [ "virtio-serial" ];
    guest = guestDoc;
    source = {
      builder = "mkGuest";
    };
  });

  image =
    pkgs.runCommand "mvm-${spec.name}"
      {
        passthru = {
          inherit
            rootfs
            initrd
            kernel
            bootKernel
            agent
            guestJson
            closure
            ;
          guest = guestDoc;
        };
      }
      ''
        mkdir $out
        for f in ${bootKernel}/*; do
          [ "''${f##*/}" = kernel.json ] || ln -s "$f" $out/
        done
        ln -s ${initrd}/initrd $out/initrd
        ln -s ${rootfs}/rootfs.ext4 $out/rootfs.ext4
        ${buildPython}/bin/python3 -c '
        import json, sys
        doc = json.load(open(sys.argv[1]))
        kernel = json.load(open(sys.argv[2]))
        doc.update(kernel=kernel["kernel"], kernel_boot=kernel["boot"])
        if kernel.get("kernel_note"):
            doc["kernel_note"] = kernel["kernel_note"]
        with open(sys.argv[3], "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
        ' ${manifest} ${bootKernel}/kernel.json $out/manifest.json
      '';
in
# Validate everything before anything is built: a misspelled attribute fails evaluation.
builtins.seq guestText image
